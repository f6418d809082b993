from django.db import models


class Document(models.Model):
    title = models.CharField(max_length=200)
    public = models.BooleanField(default=True)


class Page(models.Model):
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="pages")
    number = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["document", "number"], name="page_unique_number")
        ]
