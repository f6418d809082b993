from typing import Any

from django.db import migrations, models


def seed(apps: Any, schema_editor: Any) -> None:
    Document = apps.get_model("docsite", "Document")
    Page = apps.get_model("docsite", "Page")
    for d in range(1, 11):
        doc = Document.objects.create(id=d, title=f"Registry volume {d}", public=d != 10)
        Page.objects.bulk_create(Page(document=doc, number=n) for n in range(1, 31))


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        migrations.CreateModel(
            name="Document",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("title", models.CharField(max_length=200)),
                ("public", models.BooleanField(default=True)),
            ],
        ),
        migrations.CreateModel(
            name="Page",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("number", models.PositiveIntegerField()),
                (
                    "document",
                    models.ForeignKey(
                        on_delete=models.deletion.CASCADE,
                        related_name="pages",
                        to="docsite.document",
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("document", "number"), name="page_unique_number"
                    )
                ]
            },
        ),
        migrations.RunPython(seed, migrations.RunPython.noop),
    ]
